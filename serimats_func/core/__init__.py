"""The functional core: pure functions over pytrees with a learner axis (torch only, no files).

Typed state, the table of hook points, random keys, a learner's model, the vmapped step, metric functions."""
