"""`msgcore mail-sim`: a local e-mail provider for the embedded default and the tests (SMTP, the
SendGrid v3 HTTP API, switchable faults). See ops/mail_sim/server.py."""
