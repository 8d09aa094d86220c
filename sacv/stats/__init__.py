"""Statistics over concept vectors' scores: the contribution table and its significance tests."""
