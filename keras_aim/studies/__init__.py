"""Studies that put the library's pieces together to test claims of the
papers at small scale.

    scaling.py    AIM's findings: loss predicts probe accuracy; capacity and data help
"""
