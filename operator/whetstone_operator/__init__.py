"""The Whetstone operator and CLI. Never imports torch."""
