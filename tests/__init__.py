# A package, so that test modules can share `tests.reference` (pytest puts the repo root on sys.path).
