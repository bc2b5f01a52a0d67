"""python -m model: parameters and GFLOPs per method and size (the table in docs/method.md)."""

from model.flops import format_method_table, method_table

print(format_method_table(method_table()))
