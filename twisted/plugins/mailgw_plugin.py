"""twistd plugin: `twistd mailgw` (only a pointer; the code is in mailgw.tap)."""

from twisted.application.service import ServiceMaker

mailgw = ServiceMaker(
    "mailgw",
    "mailgw.tap",
    "Mail gateway: SMTP submission, HTTP API, tracking and delivery",
    "mailgw",
)
