"""The schema's revisions, oldest first: 0001 is the schema v1 of the stores made before migrations."""
