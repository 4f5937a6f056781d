"""``xoron setup``: the run wizard (the seed's ``python setup.py``).

questions.py (the questions as data: prompt, parser, default, choices, config fields), wizard.py
(ask, build the run config, plan the layout with ``xoron plan``'s functions, write), launch_files.py
(hostfile or sbatch script from ``launch_scripts/``, the launch command), cli.py (the verb's flags).
"""
