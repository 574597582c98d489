// The Kubeflow training-operator's PyTorchJob controller (github.com/kubeflow/training-operator, built from
// its Go module) wired into a manager like its own cmd/training-operator.v1, for bench/operator_scale.py. Two
// differences, both said in bench/RESULTS.md: the client's QPS and burst are flags (upstream has none; the
// controller-runtime default is 20/30), and no admission webhook or certificate rotation is set up (the
// loopback cluster has no Service routing to reach a webhook).
package main

import (
	"flag"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	kubeflowv1 "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	"github.com/kubeflow/training-operator/pkg/config"
	controllerv1 "github.com/kubeflow/training-operator/pkg/controller.v1"
	"github.com/kubeflow/training-operator/pkg/controller.v1/common"
)

func main() {
	var qps float64
	var burst, threads int
	var metricsAddr, probeAddr string
	flag.Float64Var(&qps, "kube-api-qps", 20, "client queries per second (controller-runtime's default: 20)")
	flag.IntVar(&burst, "kube-api-burst", 30, "client burst (controller-runtime's default: 30)")
	flag.IntVar(&threads, "controller-threads", 1, "reconcile workers (upstream's default: 1)")
	flag.StringVar(&metricsAddr, "metrics-bind-address", "0", "metrics address (0: off)")
	flag.StringVar(&probeAddr, "health-probe-bind-address", "0", "probe address (0: off)")
	opts := zap.Options{}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")

	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(kubeflowv1.AddToScheme(scheme))
	config.Config.PyTorchInitContainerImage = "alpine:3.10"
	config.Config.PyTorchInitContainerMaxTries = 100

	cfg := ctrl.GetConfigOrDie()
	cfg.QPS, cfg.Burst = float32(qps), burst
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: metricsAddr},
		HealthProbeBindAddress: probeAddr,
	})
	if err != nil {
		log.Error(err, "unable to create the manager")
		os.Exit(1)
	}
	setup := controllerv1.SupportedSchemeReconciler[kubeflowv1.PyTorchJobKind]
	if err := setup(mgr, common.GenNonGangSchedulerSetupFunc(), threads); err != nil {
		log.Error(err, "unable to set up the PyTorchJob controller")
		os.Exit(1)
	}
	log.Info("starting", "qps", qps, "burst", burst, "threads", threads)
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		log.Error(err, "manager stopped")
		os.Exit(1)
	}
}
