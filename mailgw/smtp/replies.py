"""Every SMTP reply mailgw sends, in one place (S-13).

A reply is (code, text); the enhanced status code (RFC 3463) leads the text.
Texts follow the Teenvio and Devino dialogues where they have one, so that
clients matching on those words keep working.
"""

from __future__ import annotations

Reply = tuple[int, bytes]

# The text after "220 <hostname> " in the banner (S-2).
BANNER = b"ESMTP mailgw"

OK = (250, b"2.0.0 OK")
SENDER_OK = (250, b"2.1.0 OK")
RECIPIENT_OK = (250, b"2.1.5 Accepted")
START_DATA = (354, b'Enter message, ending with "." on a line by itself')
AUTH_OK = (235, b"2.7.0 Authentication Succeeded")
READY_FOR_TLS = (220, b"2.0.0 Ready to start TLS")
CLOSING = (221, b"2.0.0 Closing connection.")
CANNOT_VRFY = (252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
HELP = (214, b"2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
# The inbound listener for bounces and complaints (D-7): no AUTH, no relaying.
INBOUND_HELP = (214, b"2.0.0 Commands: EHLO HELO STARTTLS MAIL RCPT DATA RSET NOOP VRFY HELP "
                     b"QUIT")
RELAY_DENIED = (550, b"5.7.1 Relay access denied")

INVALID_COMMAND = (500, b"5.5.1 Invalid command")
SYNTAX_ERROR = (500, b"5.5.2 Syntax error")
LINE_TOO_LONG = (500, b"5.5.2 Syntax error: line too long")
BAD_ARGUMENTS = (501, b"5.5.4 Syntax error in parameters")
AUTH_ABORTED = (501, b"5.0.0 Authentication aborted")
NEED_MAIL_RCPT = (503, b"5.5.1 valid RCPT and MAIL command must precede DATA")
NEED_MAIL = (503, b"5.5.1 valid MAIL command must precede RCPT")
SENDER_ALREADY_GIVEN = (503, b"5.5.1 Sender already specified")
ALREADY_AUTHENTICATED = (503, b"5.5.1 Already authenticated")
AUTH_IN_TRANSACTION = (503, b"5.5.1 AUTH not allowed during a mail transaction")
TLS_ALREADY_ACTIVE = (503, b"5.5.1 TLS already active")
PARAMETER_NOT_IMPLEMENTED = (504, b"5.5.4 A command parameter is not implemented")
UNKNOWN_MECHANISM = (504, b"5.5.4 Unrecognized authentication type")
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
ENCRYPTION_REQUIRED = (538, b"5.7.11 Encryption required for requested authentication mechanism")
BAD_CREDENTIALS = (535, b"5.7.8 Authentication credentials invalid")
TEMPORARY_FAILURE = (451, b"4.3.0 Temporary failure, try again later")
TOO_MANY_RECIPIENTS = (452, b"4.5.3 Too many recipients")
TLS_NOT_AVAILABLE = (454, b"4.7.0 TLS not available")
AUTH_THROTTLED = (454, b"4.7.0 Too many authentication failures, try again later")
TOO_MANY_FAILURES = (421, b"4.7.0 Too many failed attempts, closing connection")
TOO_MANY_ERRORS = (421, b"4.7.0 Too many errors, closing connection")
IDLE_TIMEOUT = (421, b"4.4.2 Idle timeout, closing connection")
DATA_TOO_SLOW = (421, b"4.4.2 Message took too long to send, closing connection")
TOO_MANY_COMMANDS = (421, b"4.7.0 Too many commands without a message, closing connection")
TOO_MANY_CONNECTIONS = (421, b"4.7.0 Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_ADDRESS = (421, b"4.7.0 Too many connections from your address, "
                                          b"try again later")
SHUTTING_DOWN = (421, b"4.3.2 Service shutting down, closing connection")


def hello(host: bytes, client_name: bytes) -> bytes:
    """The first line of the answer to HELO and EHLO. The client's name is echoed as
    printable ASCII: a CR in it would start a line of the reply's own."""
    return host + b" Hello " + _printable(client_name[:100])


def too_big(limit: int) -> Reply:
    return (552, b"5.3.4 message size exceeds fixed maximum message size (%d) bytes" % limit)


def disallowed_sender(address: str) -> Reply:
    return (553, b"5.7.1 Disallowed source address: " + _text(address))


def invalid_recipient(address: str) -> Reply:
    return (553, b"5.1.3 Invalid recipient address: " + _text(address))


def transaction_failed(reason: str) -> Reply:
    return (554, b"5.6.0 Transaction failed: " + _text(reason))


def accepted(send_id: int, message_uid: str) -> Reply:
    """S-12, as in the Teenvio dialogue: `250 OK id=1166 fa8896c2...`."""
    return (250, b"OK id=%d %s" % (send_id, message_uid.encode("ascii")))


def imported(count: int) -> Reply:
    """S-7: an empty DATA imports the recipients and sends nothing."""
    return (250, b"OK imported %d" % count)


def _text(value: str) -> bytes:
    """Reply text from client-supplied words: one line, printable ASCII only."""
    return _printable(value.encode("ascii", "replace")[:300])


def _printable(value: bytes) -> bytes:
    """Control characters and 8-bit bytes become "?"."""
    return bytes(c if 32 <= c < 127 else 0x3F for c in value)
