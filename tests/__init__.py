"""Gearbox's test suites (a package, so that test helpers have import paths like
``tests.unit.tiny_model:TinyConvNet`` that model specs can name)."""
