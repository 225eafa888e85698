"""Command line: ``python -m nbbn COMMAND [options]``; ``python -m nbbn COMMAND -h``
for a command's options."""
import argparse
import sys


def build_parser():
    """The parser: one subcommand each, which sets ``run(args) -> exit status``."""
    parser = argparse.ArgumentParser(prog="python -m nbbn",
                                     description="nbbn: batch normalization for NumPy")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .programs import example
    p = commands.add_parser("example", help="a NumPy pipeline calling BatchNorm forward and "
                                            "backward for a few SGD steps")
    p.set_defaults(run=lambda args: example.main())

    from .programs import demo
    p = commands.add_parser("demo", help="train a NumPy MLP on the digits data with and "
                                         "without BatchNorm (needs the extra 'demo')")
    demo.add_arguments(p)
    p.set_defaults(run=demo.main)

    from .programs import bench
    p = commands.add_parser("bench", help="time nbbn against NumPy and torch and against "
                                          "this machine's memory bandwidth")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)
    return parser


def main(argv=None):
    """Parse ``argv`` and run the chosen command; return its exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
