"""Leaves of the package: errors, units, grammar, wire models; they import nothing above."""
