"""A dispatcher module whose import fails: system check E005 must say so, not crash."""

raise RuntimeError("this dispatcher's module fails to import")
