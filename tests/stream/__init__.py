"""End to end on the real local stack: uploads through a real worker, hostile records and files, faults, the
review loop, trust and safety, explanations and reviewer decisions."""
