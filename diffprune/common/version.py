"""The package version, recorded in prepared datasets' manifests (a module of its own, so that a stage's cache
key does not depend on the package root's other contents)."""

VERSION = "0.1.0"
