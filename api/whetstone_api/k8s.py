"""Kubernetes' own rules for names, labels, annotations and quantities, as apimachinery and pod validation
apply them, written once: each as a Python check (for `whetstone validate`) and, where a CRD can carry it, as
the regular expression its OpenAPI `pattern` or CEL rule uses.

The regular expressions avoid backslashes so they read the same in Python, in RE2 (CEL) and inside a CEL
string literal.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

DNS_LABEL_MAX: Final = 63
DNS_SUBDOMAIN_MAX: Final = 253
LABEL_VALUE_MAX: Final = 63
QUALIFIED_NAME_MAX: Final = 63
ANNOTATIONS_TOTAL_MAX: Final = 256 * 1024
"""Total bytes of all annotation keys and values of one object (TotalAnnotationSizeLimitB)."""

_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL: Final = f"^{_LABEL}$"
"""RFC 1123 label: namespaces, volume names, pod hostnames."""
DNS_1035_LABEL: Final = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""RFC 1035 label (starts with a letter): Service names."""
DNS_SUBDOMAIN: Final = f"^{_LABEL}([.]{_LABEL})*$"
"""RFC 1123 subdomain: names of most objects (claims, ConfigMaps, Secrets, custom resources)."""
_NAME = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
QUALIFIED_NAME: Final = f"^({_LABEL}([.]{_LABEL})*/)?{_NAME}$"
"""Label and annotation keys, taint keys, topology keys: an optional DNS-subdomain prefix and '/', then a
name of at most 63 characters."""
LABEL_VALUE: Final = f"^({_NAME})?$"
"""A label value: empty, or at most 63 letters, digits, '-', '_' and '.', alphanumeric at both ends."""
QUANTITY: Final = "^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
"""resource.Quantity's grammar (a signed decimal with a binary-SI, decimal-SI or exponent suffix)."""

_dns_label = re.compile(DNS_LABEL)
_dns_1035 = re.compile(DNS_1035_LABEL)
_dns_subdomain = re.compile(DNS_SUBDOMAIN)
_name = re.compile(f"^{_NAME}$")
_label_value = re.compile(LABEL_VALUE)
_quantity = re.compile(QUANTITY)

_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def dns_label_problem(value: str, what: str = "name") -> str | None:
    """Why `value` is not an RFC 1123 label, or None."""
    if len(value) > DNS_LABEL_MAX:
        return f"{what} {value!r} is longer than {DNS_LABEL_MAX} characters"
    if not _dns_label.match(value):
        return (
            f"{what} {value!r} must be lower-case letters, digits and '-', starting and ending alphanumeric"
        )
    return None


def dns_1035_problem(value: str, what: str = "name") -> str | None:
    """Why `value` is not an RFC 1035 label (a Service name), or None."""
    if len(value) > DNS_LABEL_MAX:
        return f"{what} {value!r} is longer than {DNS_LABEL_MAX} characters"
    if not _dns_1035.match(value):
        return (
            f"{what} {value!r} must be lower-case letters, digits and '-', starting with a letter and "
            "ending alphanumeric"
        )
    return None


def dns_subdomain_problem(value: str, what: str = "name") -> str | None:
    """Why `value` is not an RFC 1123 subdomain (an object name), or None."""
    if len(value) > DNS_SUBDOMAIN_MAX:
        return f"{what} {value!r} is longer than {DNS_SUBDOMAIN_MAX} characters"
    if not _dns_subdomain.match(value):
        return (
            f"{what} {value!r} must be lower-case letters, digits, '-' and '.', starting and ending "
            "alphanumeric"
        )
    return None


def qualified_name_problem(value: str, what: str = "key") -> str | None:
    """Why `value` is not a qualified name (label or annotation key, taint or topology key), or None."""
    prefix, slash, name = value.rpartition("/")
    if slash and not prefix:
        return f"{what} {value!r}: the prefix before '/' must not be empty"
    if prefix and dns_subdomain_problem(prefix):
        return f"{what} {value!r}: the prefix {prefix!r} must be a DNS subdomain (at most 253 characters)"
    if not name:
        return f"{what} {value!r}: the name part must not be empty"
    if len(name) > QUALIFIED_NAME_MAX:
        return f"{what} {value!r}: the name part is longer than {QUALIFIED_NAME_MAX} characters"
    if not _name.match(name):
        return (
            f"{what} {value!r}: the name part must be letters, digits, '-', '_' and '.', starting and ending "
            "alphanumeric"
        )
    return None


def label_value_problem(value: str, what: str = "value") -> str | None:
    """Why `value` is not a label value, or None."""
    if len(value) > LABEL_VALUE_MAX:
        return f"{what} {value!r} is longer than {LABEL_VALUE_MAX} characters"
    if not _label_value.match(value):
        return (
            f"{what} {value!r} must be empty or letters, digits, '-', '_' and '.', starting and ending "
            "alphanumeric"
        )
    return None


def parse_quantity(value: int | str) -> Decimal:
    """The value of a Kubernetes quantity ("500m", "16Gi", "1e3", 8); ValueError when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return Decimal(value)
    match = _quantity.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a quantity (e.g. 500m, 2, 1.5Gi, 16Gi)")
    suffix = match.group(2) or ""
    number = value[: len(value) - len(suffix)]
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
        return Decimal(number) * Decimal(_SUFFIX[suffix])
    except (InvalidOperation, ValueError, OverflowError):
        raise ValueError(f"{value!r} is not a quantity") from None


def annotations_problem(annotations: dict[str, str]) -> str | None:
    """Why a set of annotations would be refused, or None: every key a qualified name, 256 KiB in all."""
    for key in annotations:
        problem = qualified_name_problem(key.lower(), "annotation key")
        if problem:
            return problem
    total = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if total > ANNOTATIONS_TOTAL_MAX:
        return f"annotations take {total} bytes, more than the {ANNOTATIONS_TOTAL_MAX} Kubernetes allows"
    return None
