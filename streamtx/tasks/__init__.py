"""Robot tasks that streamtx solves end to end: symmetry, scripted expert, data collection, closed-loop evaluation."""
