"""Every SMTP reply mailgw sends, in one place (S-13)."""

# The text after "220 <hostname> " in the banner (S-2).
BANNER = b"ESMTP mailgw"
