"""Placeholder: implemented in a later change."""


def configure(parser):
    pass


def main(args) -> int:
    raise SystemExit("cad-spconv: this command is not implemented yet")
