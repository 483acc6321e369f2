"""Data sources: each writes a region's raw inputs (synthetic, Earth Engine, STAC)."""
