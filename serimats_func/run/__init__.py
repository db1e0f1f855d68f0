"""The run: from interventions to learners (grid, setup, identity), planning into groups and chunks, the
training loop of a chunk, recording, resuming, checkpoints, and the claim/plan/train/write loop."""
