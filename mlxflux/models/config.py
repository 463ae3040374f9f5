"""One rule for the four components' configs: a model folder's config.json is mlxflux's own, so
`from_dict` refuses keys it does not know (a typo or a newer format must not pass silently);
a foreign config (transformers' config.json) goes through `known_keys` first, which keeps only
the fields mlxflux uses."""

from dataclasses import fields


def strict_from_dict(cls, d: dict, what: str):
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**d)


def known_keys(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}
