from gdlab.entry import report

report()
