from headprof.cli import main

main()
