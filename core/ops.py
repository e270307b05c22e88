"""Operator identity: the domain of ONNX Runtime's contrib ops and the one spelling of an op's key."""

from __future__ import annotations

MS_DOMAIN = "com.microsoft"


def op_key(node) -> str:
    """`domain::op` for custom domains, the bare op type for the default one (ir.Node or onnx.NodeProto)."""
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
