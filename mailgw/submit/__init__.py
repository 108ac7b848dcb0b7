"""The single submission path (ARCHITECTURE principle 1): SMTP and HTTP both end here."""
