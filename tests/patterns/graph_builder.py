"""The builder the rule tests draw their decomposed subgraphs with: fusegraph's one graph builder.

    b = Builder(np.float16, const_nodes=True)   # constants as Constant nodes, as some exporters write them
    y = b.op("Mul", "x", b.const(0.5))
    model = b.model({"x": [2, 8]}, {y: [2, 8]}, opset=18)

`const` follows `const_nodes`, `weight` is always an initializer, `reduce_mean` writes its axes
as the opset wants them; see `fusegraph.graph_builder` for the contract.
"""

from fusegraph.graph_builder import GraphBuilder as Builder

__all__ = ["Builder"]
