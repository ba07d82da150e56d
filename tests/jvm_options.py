"""JVM options of every Spark driver the suite starts (the test session, the run-all on Connect, the
killed send's subprocess).

C1 only (no C2): each JVM lives minutes on tiny data, and C2 compiled in the background for most of
that time without the code ever running long enough to pay it back. On tests/test_features_user.py
(14 tests) the session JVM used 174 CPU-s, 72 of them in C2 and 15 in C1, with the default tiers, and
100 CPU-s (7 in C1) with this option; the tests and their results are the same.
"""

JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"
