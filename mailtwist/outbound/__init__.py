"""Sending mail to other hosts: MX routing, the SMTP client, smarthost relay."""
