from latentseg.cli import command

command()
