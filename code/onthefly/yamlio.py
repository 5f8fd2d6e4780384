"""The one YAML reader: PyYAML's safe loader that refuses a key written twice in a mapping.

PyYAML keeps the last of two equal keys without a word, so a grid file or a --config file
that sets `lr` twice would silently train with the second value.
"""

from __future__ import annotations

from typing import Any

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader whose mappings raise on a repeated key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load(text), refusing duplicate keys (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)
