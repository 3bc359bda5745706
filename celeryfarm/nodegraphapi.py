"""The smallest stand-in for Katana's ``NodegraphAPI``: enough to read farm settings off a node.

Inside Katana the plug-in uses ``from Katana import NodegraphAPI``; elsewhere (tests, the
demo) this module gives the few names it needs, with the signatures of Katana 5's own
(``types-katana`` 5.0.5.0: ``NodegraphAPI-stubs/__init__.pyi`` and, for ``Node`` and
``Parameter``, ``NodegraphAPI_cmodule-stubs/__init__.pyi``; the conformance test checks them):
``CreateNode``, ``GetNode``, and nodes whose parameters form a tree of groups, strings and
numbers addressed by dotted paths (``node.getParameter('farmSettings.pool')``). Number
parameters hold floats, as Katana's do. Parameters are not animated: the ``time`` arguments
are accepted and ignored.

Katana adds its farm settings (a ``farmSettings`` group) to Render nodes when they are
created; the FarmAPI stand-in does the same through ``_NODE_CREATED``, as Katana's FarmAPI
does through its node-creation callback.
"""

from __future__ import annotations

from typing import Any, Callable

#: Called with each node that ``CreateNode`` makes (Katana: ``Callbacks.Type.onNodeCreate``).
_NODE_CREATED: list[Callable[[Node], None]] = []
_NODES: dict[str, Node] = {}


class Parameter:
    """A node parameter: a group of children, a string, a number, or an array of either."""

    def __init__(self) -> None:
        self._name, self._type, self._value = "", "group", None
        self._children: list[Parameter] = []

    def getName(self) -> str:
        return self._name

    def getType(self) -> str:
        return self._type

    def getValue(self, time: float) -> Any:
        return self._value

    def setValue(self, value: object, time: float, final: bool = True,
                 sendNotifyMessage: bool = True) -> None:
        if self._type == "number":
            value = float(value)  # type: ignore[arg-type]
        elif self._type == "string":
            value = str(value)
        else:
            raise TypeError(f"parameter {self._name!r} of type {self._type} holds no value")
        self._value = value

    def getChild(self, name: str) -> Parameter | None:
        return next((child for child in self._children if child._name == name), None)

    def getChildren(self) -> list[Parameter]:
        return list(self._children)

    def createChildGroup(self, name: str, index: int = -1) -> Parameter:
        return self._add(name, "group", None, index)

    def createChildString(self, name: str, value: str, index: int = -1) -> Parameter:
        return self._add(name, "string", str(value), index)

    def createChildNumber(self, name: str, value: float, index: int = -1) -> Parameter:
        return self._add(name, "number", float(value), index)

    def createChildStringArray(self, name: str, size: int, index: int = -1) -> Parameter:
        return self._array(name, "string", "", size, index)

    def createChildNumberArray(self, name: str, size: int, index: int = -1) -> Parameter:
        return self._array(name, "number", 0.0, size, index)

    def _add(self, name: str, kind: str, value: Any, index: int) -> Parameter:
        if self.getChild(name) is not None:
            raise ValueError(f"parameter {self._name!r} already has a child {name!r}")
        child = Parameter()
        child._name, child._type, child._value = name, kind, value
        self._children.insert(index if index >= 0 else len(self._children), child)
        return child

    def _array(self, name: str, kind: str, value: Any, size: int, index: int) -> Parameter:
        """Katana's array parameters hold their items as children ``i0``, ``i1``..."""
        array = self._add(name, f"{kind}Array", None, index)
        for item in range(size):
            array._add(f"i{item}", kind, value, -1)
        return array


class Node:
    """A node of the node graph: a type, a unique name, a tree of parameters."""

    def getName(self) -> str:
        return self._name

    def setName(self, name: str, updateExpressions: bool = True) -> str:
        """Rename the node; as in Katana, a name another node has gets a number added."""
        _NODES.pop(self._name, None)
        self._name = _unique_name(name)
        _NODES[self._name] = self
        return self._name

    def getType(self) -> str:
        return self._type

    def getParameters(self) -> Parameter:
        return self._parameters

    def getParameter(self, name: str) -> Parameter | None:
        """The parameter at a dotted path (``farmSettings.pool``), or None."""
        parameter: Parameter | None = self._parameters
        for part in name.split("."):
            parameter = parameter.getChild(part) if parameter is not None else None
        return parameter


def CreateNode(type: str, parent: Any = None) -> Node:
    """A new node named after its type (``Render``, ``Render1``...); ``parent`` is ignored:
    the stand-in has one flat graph."""
    node = Node()
    node._type, node._name, node._parameters = type, "", Parameter()
    node.setName(type)
    for callback in _NODE_CREATED:
        callback(node)
    return node


def GetNode(nodeName: str) -> Node | None:
    return _NODES.get(nodeName)


def _unique_name(name: str) -> str:
    candidate, number = name, 0
    while candidate in _NODES:
        number += 1
        candidate = f"{name}{number}"
    return candidate
