"""The autodriver: the standalone program that runs ``make`` for one grading job inside a VM."""
