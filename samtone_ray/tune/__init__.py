"""Hyperparameter tuning on Ray Tune: the space, the trials' files on disk and the leaderboard."""
