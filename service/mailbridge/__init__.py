"""mailbridge: receive email over SMTP, deliver it as signed JSON webhooks."""

__version__ = "0.1.0"
