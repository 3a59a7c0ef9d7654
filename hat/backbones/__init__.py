"""Image backbones rebuilt from offline sources (no model hub needed)."""
