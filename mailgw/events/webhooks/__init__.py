"""Webhooks (W-1, W-2): mailgw's events posted to the endpoints an account registers.

payloads.py is the projection of the event log (E-1) into the JSON bodies posted: the
Aldeamo payloads, field for field as seed 001 section 8 gives them (normalised, see
docs/webhook-payloads.md), and mailgw's own compact payload for the E-1 types Aldeamo
has no webhook for. Signing and delivery live next to it.
"""
