from fuyu.app import main

main()
