"""chronosd: a scale-to-zero cron daemon."""

__version__ = "0.1.0"
