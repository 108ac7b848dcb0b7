"""Reports as mail servers send them, for the inbound tests (D-7).

`dsn()` is a Postfix non-delivery report (RFC 3464), `arf()` a feedback report as
mailbox providers send them (RFC 5965), `exim_bounce()` a non-standard bounce; each
takes the bounce address or Message-ID of the delivery it is about.
"""

from __future__ import annotations


def dsn(return_path: str = "", message_id: str = "<x@example.org>",
        action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 <ana@example.net>: Recipient address rejected:"
                          " User unknown in virtual mailbox table",
        recipient: str = "ana@example.net") -> bytes:
    return f"""\
Return-Path: <>
From: MAILER-DAEMON@mx1.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {return_path or 'b-1-aaaaaaaaaaaaaaaa@bounces.example.org'}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
 boundary="7DB1E1C0B4.1700000000/mx1.example.net"

This is a MIME-encapsulated message.

--7DB1E1C0B4.1700000000/mx1.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{recipient}>: host mx1.example.net said: 550 5.1.1 User unknown

--7DB1E1C0B4.1700000000/mx1.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.example.net
X-Postfix-Queue-ID: 7DB1E1C0B4
Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000 (UTC)

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Diagnostic-Code: {diagnostic}

--7DB1E1C0B4.1700000000/mx1.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <{return_path}>
From: News <news@example.org>
To: {recipient}
Subject: Hello
Message-ID: {message_id}

--7DB1E1C0B4.1700000000/mx1.example.net--
""".replace("\n", "\r\n").encode()


def arf(return_path: str = "", message_id: str = "<x@example.org>",
        feedback_type: str = "abuse", recipient: str = "ana@example.net",
        original_mail_from: str | None = None) -> bytes:
    mail_from = (f"Original-Mail-From: <{original_mail_from}>\n"
                 if original_mail_from is not None else "")
    return f"""\
From: <staff@hotmail.example>
Date: Thu, 8 Mar 2005 17:40:36 EDT
Subject: FW: Earn money
To: <abuse@bounces.example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: SomeGenerator/1.0
Version: 1
{mail_from}Original-Rcpt-To: <{recipient}>
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT
Source-IP: 192.0.2.1

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

Return-Path: <{return_path}>
From: <news@example.org>
Received: from mailserver.example.net (mailserver.example.net [192.0.2.1])
Subject: Earn money
To: <{recipient}>
Message-ID: {message_id}
Date: Thu, 02 Sep 2004 12:31:03 -0500

Spam Spam Spam
--part1_13d.2e68ed54_boundary--
""".replace("\n", "\r\n").encode()


def exim_bounce(return_path: str = "", message_id: str = "<x@example.org>",
                reply: str = "550 5.1.1 <ana@example.net>: Recipient address rejected"
                ) -> bytes:
    """Exim's own wording, with the original quoted after it (no multipart/report)."""
    return f"""\
From: Mail Delivery System <Mailer-Daemon@mx.example.net>
To: {return_path or 'b-1-aaaaaaaaaaaaaaaa@bounces.example.org'}
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: ana@example.net
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  ana@example.net
    SMTP error from remote mail server after RCPT TO:<ana@example.net>:
    {reply}

------ This is a copy of the message, including all the headers. ------

Return-path: <{return_path}>
Message-ID: {message_id}
From: News <news@example.org>
Subject: Hello

Hi.
""".replace("\n", "\r\n").encode()


def out_of_office(message_id: str = "<x@example.org>") -> bytes:
    return f"""\
From: Ana <ana@example.net>
To: news@example.org
Subject: Out of office: Hello
In-Reply-To: {message_id}
Auto-Submitted: auto-replied

I am away until Monday.
""".replace("\n", "\r\n").encode()
