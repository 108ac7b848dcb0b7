"""The ESMTP submission server: one factory serves every listener (S-1)."""

from __future__ import annotations

from twisted.mail import smtp

from mailgw.smtp import replies


class SubmissionProtocol(smtp.ESMTP):
    """One SMTP session.  The reactor's callLater comes from the factory's clock."""

    def greeting(self) -> bytes:
        return self.host + b" " + replies.BANNER


class SubmissionFactory(smtp.SMTPFactory):
    protocol = SubmissionProtocol

    def __init__(self, hostname: str, tls_options, clock, idle_timeout: int) -> None:
        super().__init__(portal=None)
        self.domain = hostname.encode("idna")
        self.tls_options = tls_options
        self.clock = clock
        self.timeout = idle_timeout

    def buildProtocol(self, addr):  # noqa: N802 (Twisted's name)
        p = super().buildProtocol(addr)
        p.ctx = self.tls_options
        p.timeout = self.timeout
        p.callLater = self.clock.callLater
        return p
