"""Who an account is, for every door: its settings, its avatar and how it logs in.

`settings.py` is pure (it imports nothing of mailgw), so the store can return the
typed settings; `avatar.py` (the avatar and the realm) and `checkers.py` (the cred
checkers) stand above the store, which they read, and below the doors, which log in
through them.
"""
