"""Per-layer K/V storage: where and how one layer's keys and values are kept."""
