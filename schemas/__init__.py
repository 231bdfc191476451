"""The event contract of Enclave Gateway: events, commands, subjects and the codec.

Depends on msgspec and the standard library only; every service depends on it (STYLE §1).
"""
