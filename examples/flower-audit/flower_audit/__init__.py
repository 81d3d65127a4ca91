"""A Flower app whose server attacks every client update with spear."""
