"""IQA-based label smoothing study: the plain functions behind the DVC stages in stages/."""
