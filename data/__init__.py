"""The data/<task>/prepare.py scripts and what they share (prepare_common.py). A package, so that
`data.prepare_common` is this folder's whatever else named `data` is installed."""
