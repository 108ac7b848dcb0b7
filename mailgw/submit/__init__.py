"""The single submission path (docs/architecture.md, principle 1): SMTP and HTTP both end here."""
