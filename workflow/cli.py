"""The one argument every stage takes: which params file to read (default ./params.yaml)."""
import argparse

from workflow.config import DEFAULT_PARAMS, Params, load_params


def parse_params(argv, description: str) -> Params:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    return load_params(parser.parse_args(argv).params)
