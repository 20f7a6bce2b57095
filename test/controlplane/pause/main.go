// The pod sandbox's process (the "pause" container) of the test cluster's real node: no registry is
// reachable to pull registry.k8s.io/pause, so scripts/cluster.sh builds this one into an image FROM
// scratch. Like the upstream one, it holds the Pod's namespaces, exits on SIGINT or SIGTERM, and reaps
// the zombies it inherits as PID 1.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	children := make(chan os.Signal, 1)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
