"""`make bench`: drives the simulator through real collector workers and an embedded broker."""
