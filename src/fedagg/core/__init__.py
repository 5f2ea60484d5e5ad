"""Pure aggregation math: no I/O, no threads, no clock. Import from ``fedagg`` instead."""
