"""CBPT (Class-wise Backdoor Prompt Tuning) for clipguard: a scanner and a purifier."""

__version__ = "0.2.0"
